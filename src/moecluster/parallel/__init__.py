"""moecluster.parallel."""
