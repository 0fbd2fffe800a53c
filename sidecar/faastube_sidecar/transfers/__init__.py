"""Moving objects between host memory and GPUs: path planning, scheduling, execution.

``planner`` chooses parallel paths for one transfer from the node's topology and the
links in use; ``scheduler`` shares each link between transfers by SLO.
"""
