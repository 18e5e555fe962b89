//! Credentials: long-term keys, TURN REST API credentials and stateless nonces.
