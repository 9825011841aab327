"""Engines beside the torch one (`moecluster.engine`): today the MLX engine for Apple Silicon (`engines.mlx`)."""
