"""The MLX engine (Apple Silicon; runs on Linux CPU for correctness): mlx-lm's model definitions plus the same
expert parallelism as the torch engine (our Placement and assign(), one exact all-reduce per MoE layer) over
mx.distributed. Nothing in the torch engine imports this package; it needs `pip install 'moecluster[mlx]'`.

    loading.py          HF checkpoint dir -> mlx-lm model, reading only this rank's experts
    expert_parallel.py  the transformation: each SwitchGLU -> ExpertParallelSwitch (this rank's experts)
    comm.py             mx.distributed group (ring) + the watchdog (collectives have no timeout)
    generate.py         the decode loop in lockstep on every rank, and `moecluster generate --engine mlx`
"""
