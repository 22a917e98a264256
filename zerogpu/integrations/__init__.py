"""What sits on top of the runtime: the `spaces` compatibility module and the web frameworks."""
