"""The shared serving layer: endpoint registry, backends behind endpoints, and the client the
SQL functions and the REST server use to reach them. Light to import; engines start lazily."""
