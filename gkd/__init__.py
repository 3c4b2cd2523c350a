"""gkd: on-policy knowledge distillation (GKD) from the command line."""
