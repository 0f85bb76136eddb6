"""The report step (stage report): the run's summary and figures, the frontier study's analysis."""
