"""The Ray runtime: row tables, stages, the activation store, the pipeline driver, Tune."""
