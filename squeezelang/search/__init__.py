"""Search: solve ``auto`` knobs and ``compose`` blocks by running measured trials.

It sits above the executor (each trial is a full ``executor.run.execute``) and below the face (cli,
api): ``solve`` (the strategies and the choice), ``judging`` (verdicts, violation, which trial wins),
``workers`` (trial backends: serial, process, Ray) and ``trial_log`` (trials kept across an
interrupt). The planner below it only estimates (``planner.levels``, ``planner.compose``).
"""
