"""Running the pipeline: the workspace, the backend table, the local compute (process pool, staged
files), and the stages (ingest, train, register, promote, score, report) the CLI and the app call."""
