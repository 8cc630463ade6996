"""Performance: the throughput bench and the deployment cost model."""
