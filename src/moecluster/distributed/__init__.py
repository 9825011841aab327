"""moecluster.distributed: the Comm backends (MPI, torch.distributed) and the local launcher."""
