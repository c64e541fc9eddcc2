"""The operator's side of a running pfrest: the per-endpoint counters (counters), their Prometheus text
(metrics), readiness (health), the metrics address (monitor) and the control socket that ``pfrest cache``
reaches (controlsocket), both served by one small HTTP server (httpd, its requests read by httprequest).
Never on a request's path: a conversation only adds to the counters."""
