"""Training: the loop (:mod:`.loop`), one step's gradients (:mod:`.step`), the checkpointable state (:mod:`.state`),
resuming (:mod:`.resume`), the set-up before the state (:mod:`.setup`), optimizer and schedule (:mod:`.optim`), EMA,
checkpoint files (:mod:`.checkpoint`), stopping on a signal (:mod:`.stopping`), logging and validation."""
