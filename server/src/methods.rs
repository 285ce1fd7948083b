//! The gRPC methods the server serves, and what each needs before it runs: the one table
//! that authentication checks calls against and that the metrics label methods by.

/// The roles a method needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Reader,
    Writer,
    Privacy,
    Admin,
}

/// What a call needs before it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Health checks: load balancers call them without credentials.
    Nothing,
    /// Any authenticated principal: the registry's listings and reflection.
    AnyPrincipal,
    Role(Role),
    /// No rule allows it.
    Refused,
}

/// The rule of the method at `path` (`/package.Service/Method`).
pub fn needs(path: &str) -> Needs {
    let Some((service, method)) = path.strip_prefix('/').and_then(|path| path.split_once('/'))
    else {
        return Needs::Refused;
    };
    match (service, method) {
        ("grpc.health.v1.Health", "Check" | "Watch") => Needs::Nothing,
        (
            "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection",
            "ServerReflectionInfo",
        ) => Needs::AnyPrincipal,
        ("featurestore.v1.FeatureStore", "ListFeatures" | "ListSurfaces") => Needs::AnyPrincipal,
        ("featurestore.v1.FeatureStore", "GetFeatures") => Needs::Role(Role::Reader),
        ("featurestore.v1.FeatureStore", "WriteFeatures" | "ExplainWrite") => {
            Needs::Role(Role::Writer)
        }
        (
            "featurestore.v1.Backfill",
            "BulkLoad" | "GetLoadJob" | "AbortLoadJob" | "ListLoadJobs",
        ) => Needs::Role(Role::Writer),
        (
            "featurestore.v1.Privacy",
            "SetUserState" | "GetUserState" | "GetAuditTrail" | "EraseUser" | "GetErasureStatus",
        ) => Needs::Role(Role::Privacy),
        (
            "featurestore.v1.Admin",
            "ReloadPolicy" | "GetPolicyStatus" | "VerifyAuditLog" | "SweepExpired" | "CreateBackup"
            | "GetStats",
        ) => Needs::Role(Role::Admin),
        _ => Needs::Refused,
    }
}
