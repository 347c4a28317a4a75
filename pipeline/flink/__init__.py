"""A real Flink cluster on this machine, for trying the FlinkRunner path and for the tests: the Flink
distribution, Beam's Flink job server, and a JobManager, TaskManagers and an SDK worker pool as processes."""
