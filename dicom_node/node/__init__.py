"""Running the node: starting and supervising its parts, the periodic duties, logging."""
