"""Planning: the device model, the forward and backward tile planners (the SRAM-budget model) and the tuned-plan store."""
