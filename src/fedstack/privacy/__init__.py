"""Privacy options: secure aggregation, differential privacy, homomorphic encryption."""
