"""The memory planner behind ``zo-scale plan``: what a run holds on each GPU, in host RAM and on NVMe."""
