"""What runs the stages over a whole dataset: the pipeline (chunks, workers, input order), prepare (the streamed
Arrow dataset and fit report) and the cache folder it lives in."""
