"""Op wrappers: validation at the public boundary, dispatch, torch.library registration."""
