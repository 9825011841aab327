"""moecluster.models."""
