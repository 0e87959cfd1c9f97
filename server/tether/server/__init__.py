"""The Tether server: Binding, Provisioning and FingerprintGuard over gRPC."""
