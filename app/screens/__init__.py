"""Modal screens: help, conversation list, confirmation and text prompts."""
