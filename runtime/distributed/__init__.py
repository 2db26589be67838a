"""Tensor parallelism on torch.distributed: the rank's view of its group (parallel.py), and the worker processes that
execute rank 1.. (workers.py); rank 0 is the engine process, which schedules and broadcasts each step."""
