"""The programs dsl runs on each host, together (every backend's host command names them:
launcher/hostcmd.py):

- guard.py: owns every process the job starts on the host and leaves none behind
  (`python -m dsl.launcher.host.guard`);
- elastic.py: the per-host rank starter, torch's elastic agent with dsl's prefix, report and
  warning-signal handling (`python -m dsl.launcher.host.elastic`);
- mpirank.py: what every rank runs first under mpirun, OpenMPI's environment turned into
  torchrun's (`python -m dsl.launcher.host.mpirank`).

What they print and read is engine/wire.py's.
"""
