"""The push balancer: POST /submit goes to one model server chosen by a policy, with health and retries."""
