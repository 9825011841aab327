"""moecluster.perfmodel."""
