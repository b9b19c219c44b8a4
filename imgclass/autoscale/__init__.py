"""Autoscaling: a controller that sizes the pool of workers or model servers to the load."""
