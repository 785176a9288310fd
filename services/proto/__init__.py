"""Generated gRPC code of the simulator service (see ``generate.py``)."""
