"""moecluster.calibration: the measuring workers of `moecluster calibrate` (engine probes, bandwidth, all-reduce)."""
