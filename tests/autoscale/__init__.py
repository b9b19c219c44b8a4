"""Autoscaling tests: policies, the controller, and real pools."""
