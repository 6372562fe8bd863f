"""Prints `SEEN {json}`: the values of the names given as arguments; a name given as `#NAME`
is printed as the sha256 of its value (so a test can check a secret arrived without printing it)."""

import hashlib
import json
import os
import sys

seen = {}
for name in sys.argv[1:]:
    if name.startswith("#"):
        value = os.environ.get(name[1:])
        seen[name] = None if value is None else hashlib.sha256(value.encode()).hexdigest()
    else:
        seen[name] = os.environ.get(name)
print("SEEN " + json.dumps(seen), flush=True)
