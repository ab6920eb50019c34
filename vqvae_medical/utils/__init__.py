"""What every room of the package shares and nothing of the package below it: whole-or-absent file writes and safe
checkpoint reads, the user-error base class, the network inside a wrapper, rank-zero-first, the training-curve
figure. Imports nothing else of the package."""
