"""MLflow: where the store is, the run's lifecycle and params, sweep reports, saved UI views."""
