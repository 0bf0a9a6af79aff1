"""Fault tests: the server under crashes, outages, full disks and hostile peers."""
