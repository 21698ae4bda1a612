"""Tools around the node: the demonstration and the self-test."""
