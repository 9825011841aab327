"""moecluster.server."""
