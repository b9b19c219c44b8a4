"""Engine mode: HAProxy as the balancer's data plane, driven by this package as its control plane."""
