"""The testbed: topology, RSpec, cluster file, systemd units, SSH deploy and an emulated slice."""
