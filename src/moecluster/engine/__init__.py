"""moecluster.engine."""
