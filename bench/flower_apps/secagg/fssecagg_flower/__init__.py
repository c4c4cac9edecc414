"""The secure-aggregation cost task as a Flower App (SecAggPlusWorkflow + secaggplus_mod)."""
