"""moecluster: Mixture-of-Experts LLMs across a small cluster by expert parallelism."""

__version__ = "0.1.0"
