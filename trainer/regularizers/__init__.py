"""Regularizers against catastrophic forgetting. Replay is a data source (see trainer/data.py);
EWC is an object the training loop calls at one point, the optimizer-step boundary."""
