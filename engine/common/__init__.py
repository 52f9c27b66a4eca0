"""What the engine process and the accountant process share."""
