//! Handing live sockets to another process (being written).
