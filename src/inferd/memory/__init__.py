"""Memory: what a model needs (estimate), what the machine has (profile), and the one planner
that splits a budget between every served model (plan)."""
