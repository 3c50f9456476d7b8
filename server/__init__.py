"""The gateway (WebSockets), auth, rate limits, push fan-out, CLI and configuration."""
