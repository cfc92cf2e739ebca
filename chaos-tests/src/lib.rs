//! hubmesh-chaos: the user-runnable chaos suite (lab of hubs in network namespaces, nemeses,
//! workloads, checkers, reports). It drives real `hubmesh` binaries through their public HTTP API
//! only, and may reuse `hubmesh::client` and `hubmesh_proto::api`, never hubmesh's internals.
//!
//! Empty until the chaos-suite issue: it needs the mesh (several hubs) to have anything to break.
