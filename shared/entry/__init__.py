"""Entry scripts: what an Azure ML job (or the local runner) runs as a script, flag for flag: training,
scoring and ingestion over mounted inputs."""
