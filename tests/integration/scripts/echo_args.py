"""Writes what it received (argv and one env value) to DSL_OUTPUT_DIR/received-RANK.json."""

import json
import os
import sys

rank = os.environ.get("RANK", "x")
path = os.path.join(os.environ["DSL_OUTPUT_DIR"], f"received-{rank}.json")
with open(path, "w", encoding="utf-8") as handle:
    json.dump({"argv": sys.argv[1:], "hostile_env": os.environ.get("HOSTILE_ENV"),
               "cwd": os.getcwd()}, handle)
print(f"wrote {path}")
