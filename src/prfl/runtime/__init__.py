"""What both drivers (the simulator and the Flower driver) share to run a policy.

- :mod:`prfl.runtime.rundir`: the run directory (file names, atomic writes, resume checks);
- :mod:`prfl.runtime.history`: the history writer and reader (JSON Lines);
- :mod:`prfl.runtime.checkpoint`: the checkpoint file format (safetensors and JSON, no code);
- :mod:`prfl.runtime.machine`: the kind of machine a run computed on (a seed fixes a history per kind).

Nothing is imported here eagerly: low layers (the server buffer) use the checkpoint format, and
importing this package must not pull in the drivers' modules.
"""
