"""Training: the loop (trainer), one optimizer step (step), its randomness, the resumable state, resume, the run's log,
checkpoints, EMA and the run's settings. Nothing is imported here: import the module you need."""
